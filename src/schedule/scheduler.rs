//! The scheduler's loop: every second (and when a schedule's job ends) it asks which schedules
//! are wanted, and queues their due slots through [`super::tick_gated`]; with a lease (several
//! boxes), only while this box holds it and only the slots it claimed first.
//!
//! Owns: the loop, the lease's renewal and release, logging a failing tick. Must never: queue a
//! slot the group did not grant this box, or block the runtime on the state file (ticks run on
//! blocking threads).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Tz;
use tokio::sync::Notify;

use super::{lease, preceding, tick_gated, Gate, ScheduleSource, Slot, Ticked};
use crate::jobs::JobQueue;
use crate::shutdown::Shutdown;
use crate::store::{Cadence, PluginConfigId, StoreError};

/// How often the same failure of a tick is logged again.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(60);
/// How often due slots are looked for without a wake-up.
const TICK: Duration = Duration::from_secs(1);

/// Queues due slots every second, and at once when a schedule's job ends.
pub struct Scheduler {
    pub queue: JobQueue,
    pub source: Arc<dyn ScheduleSource>,
    pub timeout: Duration,
    /// Where day slots start.
    pub timezone: Tz,
    /// Notified by the workers when a schedule's job ends.
    pub job_done: Arc<Notify>,
    /// With several boxes: the lease that says whether this one runs the schedules.
    pub lease: Option<Arc<lease::RedisLease>>,
}

#[derive(Debug, thiserror::Error)]
enum TickError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("the schedule lease: {0}")]
    Lease(#[from] redis::RedisError),
    #[error("the scheduler's task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl Scheduler {
    pub async fn run(self, mut shutdown: Shutdown) {
        let mut held = false;
        let mut last_error = None;
        loop {
            if shutdown.is_draining() {
                break;
            }
            match self.tick_once(&mut held).await {
                Ok(queued) if !queued.is_empty() => {
                    last_error = None;
                    let now_s = crate::jobs::now_ms() / 1000;
                    for (config, cadence, slot) in &queued {
                        metrics::gauge!(crate::telemetry::names::SCHEDULE_LAG, "cadence" => cadence.name())
                            .set((now_s - slot).max(0) as f64);
                        tracing::debug!(
                            config,
                            cadence = cadence.name(),
                            slot,
                            "schedule slot queued"
                        );
                    }
                    self.queue.wake();
                }
                Ok(_) => last_error = None,
                Err(e) => {
                    // Once per minute while the same error lasts (a Redis that is down would
                    // otherwise log every second).
                    let text = e.to_string();
                    let repeat = last_error.as_ref().is_some_and(
                        |(last, at): &(String, std::time::Instant)| {
                            *last == text && at.elapsed() < ERROR_LOG_EVERY
                        },
                    );
                    if !repeat {
                        tracing::error!(error = %text, "cannot queue scheduled runs; retrying");
                        last_error = Some((text, std::time::Instant::now()));
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = self.job_done.notified() => {}
                _ = shutdown.changed() => {}
            }
        }
        if let (Some(lease), true) = (&self.lease, held) {
            match lease.release().await {
                Ok(()) => tracing::info!(holder = lease.holder(), "schedule lease given up"),
                Err(e) => {
                    tracing::warn!(error = %e, "could not give the schedule lease up; it lapses")
                }
            }
        }
    }

    /// Runs `tick_gated` on a blocking thread.
    async fn tick_with(
        &self,
        wanted: Vec<(PluginConfigId, Cadence)>,
        gate: Gate,
    ) -> Result<Ticked, TickError> {
        let store = self.queue.store().clone();
        let timeout_ms = self.timeout.as_millis() as u64;
        let tz = self.timezone;
        let now = crate::jobs::now_ms();
        let ticked = tokio::task::spawn_blocking(move || {
            tick_gated(&store, &wanted, now, timeout_ms, tz, &gate)
        })
        .await??;
        Ok(ticked)
    }

    /// One tick: the slots queued. With a lease, nothing unless this box holds it, and only
    /// slots claimed first.
    async fn tick_once(&self, held: &mut bool) -> Result<Vec<Slot>, TickError> {
        if let Some(lease) = &self.lease {
            let holds = lease.hold().await;
            let now_held = holds.as_ref().is_ok_and(|h| *h);
            if now_held != *held {
                tracing::info!(holder = lease.holder(), held = now_held, "schedule lease");
                *held = now_held;
            }
            metrics::gauge!(crate::telemetry::names::SCHEDULE_LEASE_HELD)
                .set(f64::from(u8::from(now_held)));
            if !holds? {
                return Ok(Vec::new());
            }
        }
        let source = self.source.clone();
        let wanted = tokio::task::spawn_blocking(move || source.wanted())
            .await?
            .map_err(StoreError::Conflict)?;
        let pairs: Vec<(PluginConfigId, Cadence)> =
            wanted.iter().map(|w| (w.config, w.cadence)).collect();
        let Some(lease) = &self.lease else {
            return Ok(self.tick_with(pairs, Gate::default()).await?.queued);
        };
        // The slots handed out so far: after one of another box's, or from one of this box's
        // own (claimed but perhaps not queued before a crash; the local state knows).
        let names: Vec<String> = wanted.iter().map(|w| w.name.clone()).collect();
        let mut floors = HashMap::new();
        for (w, claimed) in wanted.iter().zip(lease.claimed(&names).await?) {
            if let Some(claimed) = claimed {
                let floor = if claimed.holder == lease.holder() {
                    preceding(w.cadence, claimed.slot, self.timezone)
                } else {
                    claimed.slot
                };
                floors.insert((w.config, w.cadence), floor);
            }
        }
        // What is due, queueing nothing yet; then each due slot claimed; then the claimed queued.
        let plan = Gate {
            floors: floors.clone(),
            allow: Some(HashSet::new()),
        };
        let held_back = self.tick_with(pairs.clone(), plan).await?.held_back;
        let mut allow = HashSet::new();
        for slot in held_back {
            let Some(w) = wanted
                .iter()
                .find(|w| (w.config, w.cadence) == (slot.0, slot.1))
            else {
                continue;
            };
            match lease.claim(&w.name, slot.2).await? {
                lease::Claim::Granted => {
                    allow.insert(slot);
                }
                lease::Claim::Taken => {}
                lease::Claim::LeaseLost => break,
            }
        }
        if allow.is_empty() {
            return Ok(Vec::new());
        }
        let claimed = Gate {
            floors,
            allow: Some(allow),
        };
        Ok(self.tick_with(pairs, claimed).await?.queued)
    }
}
